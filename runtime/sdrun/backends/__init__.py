"""Where graphs run: `session.open_graph` gives every graph of a bundle one interface
(`interface.Model`), onnxruntime (`session`, with its optimised-graph cache `ortcache`)
or TensorRT engines (`trt`); `cpu` names this CPU and its int8 kernel."""
