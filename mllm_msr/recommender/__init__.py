"""The recommender: the fine-tuned multimodal LLM that answers Yes/No for (user, candidate).

* :mod:`~mllm_msr.recommender.samples`: SFT samples (preference, candidate, label) from the
  run's tables, the preference swap of the user-sensitivity metric;
* :mod:`~mllm_msr.recommender.collate`: the one collator that encodes a row for training and
  scoring (so their prompts cannot differ);
* :mod:`~mllm_msr.recommender.train_loop`: the loop each Ray Train worker runs (DeepSpeed ZeRO +
  peft LoRA);
* :mod:`~mllm_msr.recommender.score`: P(Yes) scorers (transformers, vLLM).

The model family (auto classes, processor, image sizing, answer tokens) comes from
:mod:`mllm_msr.families`; the stages that drive these are :mod:`mllm_msr.stages.train` and
:mod:`mllm_msr.stages.evaluate`.
"""
