"""Serving-time quantization of the projections and the output head, one module per idea; the quality
cost of each mode is measured by `bench/quality.py` (perplexity and greedy agreement against fp32).

* `int8` (int8.py) — weight-only, per-output-channel symmetric int8 (as gpt-fast does); activations stay
  in the model's dtype. A quarter of fp32's weight bytes; works on every device.
* `w8a8` (w8a8.py) — int8 weights *and* int8 activations quantized at every call (fbgemm's dynamic
  linear; x86 CPUs), after SmoothQuant moves activation outliers into the weights. What llama.cpp does
  for its quantized dot products, and what makes a 2-core CPU fast at batch > 1.
* `q4` (q4.py) — llama.cpp's block formats: Q4_1 projections, a Q8_0 output head, int8 activations in
  blocks of 32; `model/native_q4.py` runs the whole forward natively over them.

Each module only turns weights into modules; `model/inference.py` decides which to build.
"""
