"""List the layers of a model that stage 01 can read, with their output shape and layout.

One forward pass of a blank image with a hook on every module; each line gives the dotted name
(what LAYERS=… takes), the module's class, the output shape for one image and how 01 reads it
(grid, channels_last, tokens with their patch grid, or the classifier's vector), and marks the
model's default layers with ``*``. Layers 01 cannot read are left out unless ``--all`` is given.

    python -m tools.layers vit_b_16
    python -m tools.layers swin_t --all
    python -m tools.layers my_net.py:build --input-size 64
"""
from __future__ import annotations

import argparse
import sys

from common.cli import exit_on_stage_error


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="as MODEL: a torchvision name, efficientnet_lite0, file.py:function "
                                 "or checkpoint.pt")
    p.add_argument("--weights", default=None, help="state-dict file (not needed to list layers)")
    p.add_argument("--input-size", type=int, default=None, help="side of the network input")
    p.add_argument("--unsafe-pickle", action="store_true", help="load a whole pickled checkpoint")
    p.add_argument("--all", action="store_true", help="also list the layers 01 cannot read")
    return p


@exit_on_stage_error
def main(argv=None) -> None:
    """Print one line per readable layer (every layer with ``--all``)."""
    args = build_parser().parse_args(argv)
    from common.hooks import probe_layouts, readable
    from common.models import load_model, module_names
    bundle = load_model(args.model, weights=args.weights, random_init=args.weights is None,
                        unsafe_pickle=args.unsafe_pickle, device="cpu", input_size=args.input_size)
    side = (bundle.input_size, bundle.input_size)
    probed = probe_layouts(bundle.model, module_names(bundle.model), side, bundle.channels,
                           bundle.shapes)
    defaults = set(bundle.default_layers)
    for name, (shape, layout) in probed.items():
        ok = readable(layout, bundle.n_outputs)
        if ok or args.all:
            how = layout.describe() if ok else "not readable"
            mark = "*" if name in defaults else " "
            print(f"{mark} {name:<48} {type(bundle.model.get_submodule(name)).__name__:<24} "
                  f"{str(tuple(shape[1:])):<18} {how}")


if __name__ == "__main__":
    sys.exit(main())
