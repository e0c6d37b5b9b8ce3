"""Sentence-embedding recipes (`task: embedding`): a Hugging Face encoder such as all-MiniLM-L6-v2,
compressed stage by stage and measured after every stage like a classifier, with embedding fidelity
(cosine similarity to the float model on held-out real sentences of every text source) as the task
metric. `torchslim.pipeline.run` hands such recipes to `torchslim.encoders.run.run_embedding`."""
