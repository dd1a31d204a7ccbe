"""One runner per backend, used by the export gates, ``verify --run`` and the runtime alike.

=================  =====================================================================================
``torch_cpu``      the PyTorch module on the CPU (the gates' reference), a Polygraphy runner
``ort_cpu``        ONNX Runtime on the CPU, a Polygraphy runner
``ort_cuda``       ONNX Runtime's CUDA provider: device tensors in and out, CUDA graphs, in-memory rewrites
                   of the graph (``ort_lowering``) checked where they run (``self_check``)
``engine``         a TensorRT or TensorRT-RTX engine: device tensors, one stream ordered with torch's
``backends``       which engine backends this machine has; ``engine_info``: what an engine file holds and
                   whether it deserialises here
=================  =====================================================================================

Heavy or optional modules (tensorrt, tensorrt_rtx, onnxruntime's CUDA provider, torch CUDA) are imported
when a runner is opened, so this package imports on a CPU-only machine.
"""
