"""What is learnt offline for a checkpoint, never while serving: the domain score's fit and the choice of its
method (``domain``), the Ensemble of Diverse Models' training (``edm``), the engine's warm start
(``warm_start``) and the misinformation model's training (``misinformation``).

Each writes its artifact beside the checkpoint through the serving module that reads it back
(``defense.domain``, ``defense.baselines.edm``, ``defense.warm_start``, ``defense.misinformation``);
those serving modules never import anything from here.
"""
