"""Recovery: distil the dense teacher into the pruned student before export.

- :mod:`tyr.recovery.data`: recovery text, mixed from local sources, disjoint from calibration,
  search and evaluation text; a budget larger than the text is one clear error;
- :mod:`tyr.recovery.loss`: KL(teacher ‖ student) on the teacher's top-k tokens plus a tail bucket,
  on the fly, plus an optional next-token loss;
- :mod:`tyr.recovery.lora`: LoRA adapters (``peft``) or full training; padding heads stay zero;
- :mod:`tyr.recovery.checkpoint`: safetensors checkpoints with a sha256 manifest;
- :mod:`tyr.recovery.trainer`: the resumable AdamW loop (warm-up + cosine, accumulation, clipping,
  bf16 autocast, data parallel under torchrun);
- :mod:`tyr.recovery.student`: save / reload an in-memory pruned model.

The recipe is ``python -m tyr.recipes.recover run=<pipeline or prune run dir>``.
"""
