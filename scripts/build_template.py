#!/usr/bin/env python
"""Build the canonical template (averaged_model.ply): fit each training subject's Gaussians
(one per FLAME triangle, positions at points3D) with our renderer, average them, write a PLY.

    python scripts/build_template.py --data_root data/nersemble --subjects 306 369 --output runs/template.ply
"""

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastavatar.config import option, parse_config  # noqa: E402
from fastavatar.data import SubjectParser, discover_subjects  # noqa: E402
from fastavatar.io.ply import save_ply  # noqa: E402
from fastavatar.train.template import TemplateFitConfig, build_template  # noqa: E402
from fastavatar.runtime import resolve_device  # noqa: E402


@dataclass
class BuildTemplateConfig(TemplateFitConfig):
    data_root: str = option("data/nersemble", "folder of subject folders")
    subjects: List[str] = option([], "subject ids to fit (empty: all)")
    image_scale: float = option(0.5, "image scale used for fitting")
    output: str = option("pretrained_weights/averaged_model.ply", "where to write the template PLY")
    device: str = option("auto", "auto, cpu or cuda")


def main(argv=None) -> int:
    cfg = parse_config(BuildTemplateConfig, argv, description=__doc__)
    parsers = [SubjectParser(p, image_scale=cfg.image_scale)
               for p in discover_subjects(cfg.data_root, cfg.subjects or None, verbose=True)]
    fit_cfg = TemplateFitConfig(**{f.name: getattr(cfg, f.name) for f in fields(TemplateFitConfig)})
    template = build_template(parsers, fit_cfg, device=resolve_device(cfg.device))
    rows = save_ply(cfg.output, template)
    print(f"[template] wrote {cfg.output}: {rows} Gaussians averaged over {len(parsers)} subjects")
    return 0


if __name__ == "__main__":
    from fastavatar.cli import run_script

    sys.exit(run_script(main))
