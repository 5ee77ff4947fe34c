"""``deepdefense ownership verify``: does a suspect model repeat a key's watermark (``server/watermark.py``)?

It reads the key's watermarked queries from the store the server keeps them in (the same settings and
``DD_*`` variables: ``budget_db`` or ``state``), sends them to the suspect — an API that speaks our
``/predict`` with ``pixels``, or a checkpoint file run here — counts the watermark classes that come back,
and weighs that count against what a model trained without our answers would give (a binomial test), and the
ranks the suspect's probabilities give the watermark classes against the uniform ranks such a model gives them
(an exact test; ``server.watermark.ownership_test``). The last line printed is JSON with ``p_value`` and ``verdict``.
"""

from __future__ import annotations

import argparse
import json
import sys

from deepdefense import flags

HELP = "prove a suspect model was copied: send a key's watermarked queries, weigh the watermark labels and ranks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="verify: test a suspect")
    v = sub.add_parser("verify", help=HELP, formatter_class=flags.HelpFormatter)
    key = v.add_mutually_exclusive_group(required=True)
    key.add_argument("--key-id", help="the key's id (12 hex digits, as in /metrics and /v1/admin/flags)")
    key.add_argument(
        "--api-key-file", help="a file holding the key itself (its id is computed with the server's secret)"
    )
    suspect = v.add_mutually_exclusive_group(required=True)
    suspect.add_argument("--suspect-url", help="the suspect's API, speaking our POST /predict with pixels")
    suspect.add_argument("--suspect-checkpoint", help="the suspect model: a checkpoint's metadata JSON, run here")
    v.add_argument("--suspect-key-file", default=None, help="a file with the API key the suspect's API asks for")
    v.add_argument("--checkpoint", default=None, help="the victim (default: the server's, DD_CHECKPOINT)")
    v.add_argument("--budget-db", default=None, help="the server's SQLite state (default: DD_BUDGET_DB)")
    v.add_argument("--state", default=None, help="the server's Redis state (default: DD_STATE)")
    v.add_argument("--batch-size", type=int, default=16, help="queries per request to the suspect (default: 16)")
    v.add_argument("--timeout", type=float, default=60.0, help="seconds per request to the suspect (default: 60)")
    flags.add_out(v, "the verdict")


def run(args: argparse.Namespace) -> int:
    from deepdefense.clients.oracle import OracleError, read_api_key
    from deepdefense.measure.ownership_verify import Suspect, verify_ownership
    from deepdefense.server.settings import ServerSettings
    from deepdefense.server.watermark import FLOOR

    given = {k: getattr(args, k) for k in ("checkpoint", "budget_db", "state") if getattr(args, k) is not None}
    key = read_api_key(args.api_key_file) if args.api_key_file else None
    if args.api_key_file and not key:
        raise ValueError(f"{args.api_key_file} holds no API key")
    suspect = Suspect(args.suspect_url, args.suspect_key_file, args.suspect_checkpoint, args.timeout)
    try:
        kid, verdict = verify_ownership(ServerSettings(**given), suspect, key, args.key_id, args.batch_size)
    except OracleError as err:
        print(f"deepdefense ownership: the suspect's API: {err}", file=sys.stderr)
        return 1
    print(f"key {kid}: {verdict.queries} watermarked queries sent, {verdict.agreed} answered with their watermark")
    print(
        f"an independent model is expected to agree on {verdict.expected:.2f} (binomial, rate {verdict.chance:.4f} = "
        f"the largest of the floor {FLOOR}, the victim's mean probability of the watermark classes "
        f"{verdict.victim_rate:.4f} and the suspect's rate of answering one other wrong class "
        f"{verdict.suspect_rate:.4f})"
    )
    print(f"the count's p-value {verdict.count_p_value:.3g}")
    if verdict.mean_rank is not None:
        print(
            f"the watermark classes' mean rank among the suspect's {verdict.classes - 1} classes other than the label: "
            f"{verdict.mean_rank:.2f} (an independent model: uniform ranks, mean {verdict.classes / 2:.1f}); "
            f"exact p-value of their sum {verdict.rank_p_value:.3g}"
        )
    combined = "twice the smaller of the two (Bonferroni)" if verdict.mean_rank is not None else "the count's"
    print(f"p-value {verdict.p_value:.3g} ({combined}): {verdict.verdict}")
    result = {"command": args.command_line, "key_id": kid, **verdict.as_dict()}
    if args.out:
        flags.write_json(args.out, result)
    print(json.dumps(result))  # the last line
    return 0
