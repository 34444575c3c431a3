"""Jobs built on the pipeline: a folder of pairs (`runner`, `dataset`), the model-output
cache (`cache`), threshold tuning (`tune`), evaluation reports (`evaluate`), the metric
(`score`), the golden check (`check`), synthetic pairs (`synth`), pictures (`viz`)."""
