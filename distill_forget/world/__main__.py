"""MiniCanvas, the embedded concept world.

    python -m distill_forget.world --list      the world's concepts as JSON
    python -m distill_forget.world --render out.png
                                               one rendered image per (object, style)
    python -m distill_forget.world --text-geometry [FOLDER]
                                               per concept, how much of a linear cross-attention
                                               edit moving it alone is left undone (text_geometry.py);
                                               FOLDER defaults to the shipped model
"""

import argparse
import json

from distill_forget.world.concepts import listing


def print_text_geometry(folder: str | None) -> None:
    from distill_forget.config import resolve_model_dir
    from distill_forget.pipelines import load_pipeline
    from distill_forget.world.text_geometry import mean_edit_residuals

    pipe = load_pipeline(resolve_model_dir(folder))
    for domain in ("object", "style"):
        residuals = mean_edit_residuals(pipe.tokenizer, pipe.text_encoder, domain)
        mean = sum(residuals.values()) / len(residuals)
        print(f"{domain} edit residual (0: movable alone, 1: not at all), mean {mean:.3f}")
        for name, value in residuals.items():
            print(f"  {name:<16} {value:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill_forget.world", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print objects, styles and neighbour groups as JSON")
    parser.add_argument("--render", metavar="PNG", help="write a grid of renders, rows objects, columns styles")
    parser.add_argument("--text-geometry", nargs="?", const="", metavar="FOLDER", help="edit residual per concept")
    args = parser.parse_args(argv)
    if args.text_geometry is not None:
        print_text_geometry(args.text_geometry or None)
        return
    if args.render:
        import torch

        from distill_forget.evaluate import save_grid_png
        from distill_forget.world.render import grid_pairs, render_batch

        save_grid_png(torch.from_numpy(render_batch(grid_pairs(), seed=0)).permute(0, 3, 1, 2), args.render)
        print(f"renders in {args.render}")
    if args.list or not args.render:
        print(json.dumps(listing(), indent=2))


if __name__ == "__main__":
    main()
