"""The application layer: the ``rcsr`` command line and the vLLM-facing harness.

It sits above both libraries: :mod:`rcsr_deploy` (the quantizer, pure of vLLM) and :mod:`vllm_plugin`
(the quantization method vLLM loads, which imports only ``rcsr_deploy.format`` / ``packing`` /
``errors``).  Modules: :mod:`.main` (click commands), :mod:`.vllm_cli` (vLLM's own CLI on the CPU or
CUDA build), :mod:`.server` (one vLLM-server lifecycle: start, wait healthy, stop the process tree),
:mod:`.bench` (``rcsr bench``: vLLM's benchmark commands side by side).
"""
