"""The prepared GPU suite of issue #19: one run, on the Ray-free engine, of everything the GPU path is judged by.

    make gpu-suite [OUT=dir]            # python -m benchmarks.gpu_suite --out dir   (CUDA, fp16)
    make gpu-suite SMOKE=1              # the same code on the CPU with the tiny builtin models

Needs torch, transformers, peft, safetensors, diffusers, pydantic and Pillow
(``make gpu-wheels`` bundles what a GPU host with the first four lacks; the CLIP
vocabulary ships with lorafleet); never Ray. Models have random weights built from
the architecture configs lorafleet ships (``deployments/engine/configs``):
nothing is downloaded. Parts, each with its own time budget so that the run
ends within 8 minutes on an H200 (fewer iterations, never smaller models):

- (a) ``step``: one UNet step alone at 2, 16, 32 and 64 rows: the base UNet,
  the served multi-LoRA UNet with 8 adapters mixed over the rows under the
  grouped and the gather kernel, and both replayed from a CUDA graph.
- (b) ``engine``: the engine end to end (prompt encoding, ``StepScheduler``
  with multi-LoRA slots filled by ``AdapterResidency``, VAE decode), SD1.5's
  architecture, 512 px, 30 steps of DPM++ 2M, guidance 7.5, each request's
  adapter drawn Zipf(1.1) over 8 rank-16 adapters; closed loops of 1, 8 and
  32 requests in flight: images/s, p50, p95. Before it, the time to make an
  adapter resident from host memory.
- (c) ``diffusers``: the same model in diffusers' pipeline: one image per
  call (``set_adapters`` per request), 8 per call without LoRA, and peft's
  mixed batch (``adapter_names``) of 8 requests.
- (d) ``sdxl``: SDXL base's architecture at 1024 px: the step at 2 and 16
  rows, then the engine end to end at 1 and 4 requests in flight.
- (e) ``memory``: ``torch.cuda.max_memory_allocated`` around each part, the
  bytes of the adapter slots and of each CUDA graph's pool.
- (f) ``correctness``: CUDA graph vs eager, max abs difference of the latents
  after a whole denoising run (the step-level capture, and the engine's own
  graphs against its eager engine); served images vs diffusers' on the same
  weights, seeds and adapters (PSNR).
- (g) ``compile``: ``model.compile: regional`` on a fresh UNet with the slots:
  compile time, the compiled mixed step against eager, and another adapter mix
  under ``fail_on_recompile`` (it must not recompile).

It writes ``suite.json`` and ``suite.md`` (with PASS/MISS per target of the
issue) into ``--out``, and ``suite.partial.json`` after every part (a run cut
short by its host still gives what it measured). A measurement the engine cannot make yet, or one that
needs CUDA, is recorded with its reason instead of a number.
"""
