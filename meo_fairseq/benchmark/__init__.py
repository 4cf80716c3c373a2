"""Benchmarks of the expert layers: ``python -m meo_fairseq.benchmark {flops,layers,model} ...``.

* ``flops``  -- FLOPs of a BERT-like masked LM built from the plugin's real :class:`MoEFFN`
  layers, counted with ``torch.utils.flop_counter.FlopCounterMode`` (dense, vanilla MoE, MEO),
  and the paper's FLOPs-vs-k figure (``--sweep``). See :mod:`.flops`.
* ``layers`` -- time and memory of one expert FFN (dense, token MoE, sequence MoE, MEO,
  token-level MEO), forward and forward+backward, as ratios to the dense FFN. See :mod:`.layers`.
* ``model``  -- ``fairseq-train`` words/s and ``fairseq-generate`` sentences/s of dense, MoE and
  MEO models on the small data slices in ``tests/data``. See :mod:`.model`.
"""
