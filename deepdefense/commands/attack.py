"""``deepdefense attack``: the model-stealing adversary of DeepDefense §3, over HTTP."""

from __future__ import annotations

import argparse
import sys

from deepdefense import flags
from deepdefense.clients.attack import STRATEGIES, AttackConfig
from deepdefense.clients.attack_losses import ATTACK_LOSSES
from deepdefense.clients.attack_model import TrainingRecipe
from deepdefense.models.data import SPECS
from deepdefense.models.registry import list_models

HELP = "steal the served model: query it, store the transfer set, train and test an attack model"
DESCRIPTION = (
    "The model-stealing adversary of DeepDefense §3 over HTTP. The transfer set is stored as it is "
    "collected; rerunning the same command continues where an interrupted run stopped."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = AttackConfig()
    flags.add_server_url(p)
    p.add_argument("--budget", type=int, default=d.budget, help="query budget B")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=d.strategy,
        help="random: sample P_A (Knockoff Nets); jbda: Jacobian-based augmentation (Papernot et al.)",
    )
    p.add_argument(
        "--loss",
        choices=ATTACK_LOSSES,
        default=d.loss,
        help="explanations: eq. (1); probabilities: soft labels; labels: top-1 only",
    )
    p.add_argument(
        "--dataset",
        default=d.dataset,
        choices=sorted(SPECS),
        help="the attacker's data set P_A (queries come from its training split)",
    )
    flags.add_data_root(p)
    p.add_argument("--arch", default=None, choices=list_models(), help="attack model (default: the victim's)")
    flags.add_fields(p, TrainingRecipe)
    p.add_argument("--query-batch", type=int, default=d.query_batch, help="images per request")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the query order and the attack model's training")
    p.add_argument("--seed-size", type=int, default=d.seed_size, help="JBDA: size of the seed set S_0")
    p.add_argument("--jbda-step", type=float, default=d.jbda_step, help="JBDA: step λ of the augmentation")
    p.add_argument("--rounds", type=int, default=d.rounds, help="JBDA: labelling rounds max_ρ")
    p.add_argument("--test-n", type=int, default=None, help="test on the first n victim test images (default: all)")
    p.add_argument("--store", default=None, help="transfer-set folder (default: runs/transfer-sets/<derived name>)")
    flags.add_device(p)
    flags.add_out(p)
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from deepdefense.clients.attack import run_attack
    from deepdefense.clients.oracle import HttpOracle, OracleError, read_api_key
    from deepdefense.common.device import resolve_device

    config = AttackConfig(
        budget=args.budget,
        strategy=args.strategy,
        loss=args.loss,
        dataset=args.dataset,
        data_root=str(args.data_root) if args.data_root else None,
        arch=args.arch,
        recipe=flags.from_fields(TrainingRecipe, args),
        query_batch=args.query_batch,
        seed=args.seed,
        seed_size=args.seed_size,
        jbda_step=args.jbda_step,
        rounds=args.rounds,
        test_n=args.test_n,
        device=str(resolve_device(args.device)),
    )
    try:
        with HttpOracle(args.url, read_api_key(args.api_key_file), timeout=args.timeout) as oracle:
            result = run_attack(oracle, config, args.store, progress=not args.quiet)
    except OracleError as err:
        print(
            f"deepdefense attack: {err}; the answers so far are stored, rerun the same command to continue",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "deepdefense attack: interrupted; the answers so far are stored, rerun the same command to continue",
            file=sys.stderr,
        )
        return 130
    return flags.print_report({"command": args.command_line, "url": args.url, **result}, args.out)
