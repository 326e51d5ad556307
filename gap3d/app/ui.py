"""The Gradio page of ``gap3d app`` and the command that serves it.

Inputs: prompt, optional image (enabled only when the aligner's prompt encoder is a VLM),
seed, Euler steps, CFG scale; example prompts. Outputs: an interactive 3D viewer of the
generated GLB, the preview renders, the PCA-RGB map of the generated patch tokens, and the
result JSON. Errors a user can fix appear as a message in the page (``gr.Error``).

The server binds to ``app.host`` (127.0.0.1 by default) and never opens a public share
link; Gradio's usage analytics are switched off.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from gap3d.app.backend import AppBackend, AppError
from gap3d.config import Gap3dConfig

__all__ = ["build_ui", "launch", "cli_main"]

TITLE = "gap3d — text to 3D through a frozen image-to-3D generator"


def build_ui(backend: AppBackend) -> Any:
    """The ``gr.Blocks`` page for ``backend`` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    cfg = backend.cfg
    images_ok = bool(backend.supports_images())

    def run(prompt: str, image: str | None, seed: float, steps: float, cfg_scale: float):
        try:
            res = backend.generate(prompt, image or None, int(seed), int(steps), float(cfg_scale))
        except AppError as e:
            raise gr.Error(str(e), duration=None) from e
        return (
            str(res.glb) if res.glb else None,
            [str(p) for p in res.previews],
            str(res.pca) if res.pca else None,
            res.result,
            res.summary(),
        )

    with gr.Blocks(title="gap3d") as ui:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(backend.status(), elem_id="gap3d-status")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="a small blue sphere",
                    lines=2,
                    elem_id="gap3d-prompt",
                )
                image = gr.Image(
                    label="Image (text + image prompts; needs a VLM prompt encoder)"
                    if images_ok
                    else "Image (not available: this aligner's prompt encoder is text-only)",
                    type="filepath",
                    interactive=images_ok,
                    elem_id="gap3d-image",
                )
                with gr.Row():
                    seed = gr.Number(label="Seed", value=cfg.sample.seed, precision=0)
                    steps = gr.Slider(
                        1, cfg.app.max_steps, value=cfg.sample.steps, step=1, label="Euler steps"
                    )
                    cfg_scale = gr.Slider(
                        0.0, 10.0, value=cfg.sample.cfg_scale, step=0.1, label="CFG scale"
                    )
                go = gr.Button("Generate", variant="primary", elem_id="gap3d-generate")
                gr.Examples(examples=[[p] for p in cfg.app.examples], inputs=[prompt])
            with gr.Column(scale=3):
                summary = gr.Markdown(elem_id="gap3d-summary")
                model = gr.Model3D(
                    label="3D result (GLB; drag to rotate)",
                    clear_color=(0.95, 0.95, 0.95, 1.0),
                    height=360,
                    elem_id="gap3d-model",
                )
                previews = gr.Gallery(
                    label="Preview renders", columns=4, height=180, elem_id="gap3d-previews"
                )
                pca = gr.Image(
                    label="PCA-RGB map of the generated patch tokens",
                    type="filepath",
                    interactive=False,
                    elem_id="gap3d-pca",
                )
        with gr.Accordion("result.json", open=False):
            result = gr.JSON(elem_id="gap3d-result")
        inputs = [prompt, image, seed, steps, cfg_scale]
        outputs = [model, previews, pca, result, summary]
        go.click(run, inputs=inputs, outputs=outputs, api_name="generate")
        prompt.submit(run, inputs=inputs, outputs=outputs)
    return ui


def launch(
    backend: AppBackend, host: str, port: int, block: bool = True, quiet: bool = False
) -> Any:
    """Serve the page; returns the ``gr.Blocks`` (call ``.close()`` when not blocking)."""
    ui = build_ui(backend)
    backend.out_root.mkdir(parents=True, exist_ok=True)
    ui.queue(default_concurrency_limit=1)
    ui.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        allowed_paths=[str(backend.out_root.resolve())],
        show_error=True,
        quiet=quiet,
        footer_links=["settings"],
    )
    return ui


def cli_main(cfg: Gap3dConfig, args: argparse.Namespace) -> int:
    """``gap3d app [--host H] [--port P] [--aligner DIR] [--generator NAME]``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    host = getattr(args, "host", None) or cfg.app.host
    port = getattr(args, "port", None) or cfg.app.port
    backend = AppBackend(
        cfg, getattr(args, "aligner", None), generator=getattr(args, "generator", None)
    )
    if not backend.ready():
        print(f"gap3d app: note: {backend.not_ready_message()}", flush=True)
    print(
        f"gap3d app: http://{host}:{port}/  (config {cfg.name}; outputs in "
        f"{Path(backend.out_root)}/; Ctrl+C stops)",
        flush=True,
    )
    launch(backend, host, port, block=True, quiet=True)
    return 0
