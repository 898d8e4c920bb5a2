"""The CPU Gradio demo: the base model and the GRPO-tuned adapter answer one prompt side by side.

python -m app --run-dir runs/tiny            serve it (what `make demo` runs)
python -m app.screenshot --run-dir runs/tiny --out docs/demo.png

spec.py       resolve_spec: what to serve (run dir, model, adapter, task), checked before loading
serving.py    load_demo: the one model loader, adapter, examples, rewards
streaming.py  PairGenerator: base (adapters disabled) and tuned tokens, interleaved, streamed
cpu_attention.py  decode attention for a 16-bit model on CPU (float32 cache)
worker.py     ModelThread: the one thread that runs every torch call
ui.py         build_app(demo) -> gr.Blocks, with the `/compare` API endpoint and the queue
explorer.py   one group through one GRPO step on the served model (the update on a scratch copy)
explorer_ui.py  the "Inside one GRPO step" tab over explorer.py, with the `/explore` endpoint
browser.py    serve (subprocess on a free port) and compare_in_browser (Playwright, Chromium)
screenshot.py the README screenshot through browser.py, the browser test's code path
"""
