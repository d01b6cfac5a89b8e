"""MiniCanvas, the embedded concept world.

    python -m distill_forget.world --list      the world's concepts as JSON
    python -m distill_forget.world --render out.png
                                               one rendered image per (object, style)
"""

import argparse
import json

from distill_forget.world.concepts import listing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill_forget.world", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print objects, styles and neighbour groups as JSON")
    parser.add_argument("--render", metavar="PNG", help="write a grid of renders, rows objects, columns styles")
    args = parser.parse_args(argv)
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
