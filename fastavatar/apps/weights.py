"""The model files fastavatar uses: where each comes from, its pinned sha256, where our loaders look
for it, and the ``download_weights`` / ``--verify`` logic over them.

Downloadable (stable public URL, pinned sha256), installed where the loaders search:

=============  =========================================================  =====================================
name           file                                                       installed at
=============  =========================================================  =====================================
buffalo_l      insightface ``buffalo_l.zip`` (v0.7 release) -> det_10g,    ``<weights_dir>/insightface/buffalo_l/``
               w600k_r50 (the two models :mod:`fastavatar.face` loads)
dinov2_vitb14  DINOv2 ViT-B/14 backbone ``dinov2_vitb14_pretrain.pth``     ``<weights_dir>/``
lpips_alex     torchvision ``alexnet-owt-7be5be79.pth`` (LPIPS trunk)      ``$TORCH_HOME/hub/checkpoints/``
lpips_vgg      torchvision ``vgg16-397923af.pth`` (LPIPS trunk)            ``$TORCH_HOME/hub/checkpoints/``
=============  =========================================================  =====================================

Not downloadable (printed instructions, checked by ``--verify``): the official FastAvatar
weights (a Google-Drive zip) and FLAME (licence registration).

**Where the sha256 values come from.** None of the vendors publishes a sha256 file next to
these downloads. torchvision embeds the first 8 hex digits of each file's sha256 in its name
(``alexnet-owt-7be5be79`` -> ``7be5be79...``) and ``torch.hub`` checks exactly that prefix; the
full digests below were taken from several independent public repositories that pinned these
exact URLs, agree with each other and (for torchvision) start with the published prefix. No file
could be downloaded on the machine this was written on, so the digests have not been recomputed
here. A mismatch therefore stops the install (the file is deleted, nothing is replaced) and the
message says so; a changed upstream file needs a new pin, never a silent accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from fastavatar.io.download import DownloadError, check_writable, download, extract_zip_members, sha256_file

DEFAULT_WEIGHTS_DIR = Path("pretrained_weights")
"""The folder the loaders' defaults point at (relative to the working directory, as theirs are)."""

SHA256_PROVENANCE_THIRD_PARTY = "full sha256 as pinned by several independent public repositories (no vendor-published sha256)"
SHA256_PROVENANCE_TORCHVISION = ("torchvision publishes the 8-hex sha256 prefix in the file name; full sha256 as pinned "
                                 "by several independent public repositories, consistent with that prefix")


@dataclass(frozen=True)
class WeightFile:
    """One downloadable file and where it is installed."""

    name: str  # key for --only
    what: str  # one-line description
    url: str  # stable public URL
    sha256: str  # pinned sha256 of the downloaded file
    size: Optional[int]  # bytes, when known (informational: the sha256 is what is checked)
    target: Callable[[Path], Path]  # weights_dir -> installed file (or, for archives, the folder)
    sha256_source: str  # where the pinned digest comes from (see the module docstring)
    hash_prefix: Optional[str] = None  # vendor-published sha256 prefix (torchvision file names)
    members: Dict[str, Optional[str]] = field(default_factory=dict)  # archive: member base name -> sha256
    licence: str = ""  # use restrictions worth printing

    @property
    def is_archive(self) -> bool:
        return bool(self.members)

    def installed_files(self, weights_dir: Path) -> List[Tuple[Path, Optional[str]]]:
        """[(path, pinned sha256 or None)] of what is on disk after a successful install."""
        target = self.target(weights_dir)
        if self.is_archive:
            return [(target / name, digest) for name, digest in self.members.items()]
        return [(target, self.sha256)]


def _lpips_target(net: str) -> Callable[[Path], Path]:
    def target(_: Path) -> Path:
        from fastavatar.losses import lpips_trunk_path

        return lpips_trunk_path(net)

    return target


def _insightface_target(weights_dir: Path) -> Path:
    return weights_dir / "insightface" / "buffalo_l"


def _dinov2_target(weights_dir: Path) -> Path:
    from fastavatar.io.checkpoints.tracker import BACKBONE_WEIGHTS_NAME

    return weights_dir / BACKBONE_WEIGHTS_NAME


REGISTRY: Tuple[WeightFile, ...] = (
    WeightFile(
        name="buffalo_l",
        what="insightface buffalo_l face detector (det_10g.onnx) + ArcFace (w600k_r50.onnx)",
        url="https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",
        sha256="80ffe37d8a5940d59a7384c201a2a38d4741f2f3c51eef46ebb28218a7b0ca2f",
        size=288_621_354,
        target=_insightface_target,
        sha256_source=SHA256_PROVENANCE_THIRD_PARTY,
        members={
            "det_10g.onnx": "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91",
            "w600k_r50.onnx": "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43",
        },
        licence="insightface models: non-commercial research use only",
    ),
    WeightFile(
        name="dinov2_vitb14",
        what="DINOv2 ViT-B/14 backbone (facebookresearch/dinov2), start of tracker training",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        sha256="0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73",
        size=346_378_731,
        target=_dinov2_target,
        sha256_source=SHA256_PROVENANCE_THIRD_PARTY,
        licence="DINOv2 weights: Apache-2.0",
    ),
    WeightFile(
        name="lpips_alex",
        what="torchvision AlexNet trunk for the LPIPS loss/metric (alex, the default)",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        size=244_408_911,
        target=_lpips_target("alex"),
        sha256_source=SHA256_PROVENANCE_TORCHVISION,
        hash_prefix="7be5be79",
    ),
    WeightFile(
        name="lpips_vgg",
        what="torchvision VGG16 trunk for LPIPS with --lpips_net vgg",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        size=553_433_881,
        target=_lpips_target("vgg"),
        sha256_source=SHA256_PROVENANCE_TORCHVISION,
        hash_prefix="397923af",
    ),
)

# The pins must agree with the prefixes torchvision publishes in its file names.
for _entry in REGISTRY:
    assert _entry.hash_prefix is None or _entry.sha256.startswith(_entry.hash_prefix), _entry.name


@dataclass(frozen=True)
class ManualFile:
    """A file nothing can fetch automatically: instructions, and a check once it is placed."""

    name: str  # key for --only / --verify
    files: Tuple[str, ...]  # paths relative to weights_dir (or absolute)
    instructions: str  # exact steps, one paragraph
    optional: Tuple[str, ...] = ()  # files that may be absent


FASTAVATAR_ZIP_URL = "https://drive.google.com/file/d/1_XPTo_1rgzxvGQcRI7Toa3iGagytPTjK/view?usp=sharing"
FLAME_URL = "https://flame.is.tue.mpg.de"

MANUAL: Tuple[ManualFile, ...] = (
    ManualFile(
        name="fastavatar",
        files=("decoder_neutral_flame.pth", "encoder_neutral_flame.pth", "dino_encoder.pth"),
        optional=("averaged_model.ply",),
        instructions=(
            f"the official FastAvatar weights are a Google-Drive zip linked from the FastAvatar README "
            f"(github.com/hliang2/FastAvatar, 'Download Pretrained Models': {FASTAVATAR_ZIP_URL}); open it in a "
            f"browser, download, unzip, and put decoder_neutral_flame.pth, encoder_neutral_flame.pth and "
            f"dino_encoder.pth (and averaged_model.ply, optional) in {{weights_dir}}/; then run "
            f"`python scripts/download_weights.py --verify --only fastavatar`"
        ),
    ),
    ManualFile(
        name="flame",
        files=("flame/flame2023.pkl",),
        instructions=(
            f"FLAME needs a free licence: register at {FLAME_URL}, download FLAME 2023 (the version VHAP tracks "
            f"with), and put flame2023.pkl at {{weights_dir}}/flame/flame2023.pkl (or pass --flame_model PATH to "
            f"the scripts that use it); then run `python scripts/download_weights.py --verify --only flame`"
        ),
    ),
)

ALL_NAMES = tuple(e.name for e in REGISTRY) + tuple(m.name for m in MANUAL)


def select(only: Optional[Sequence[str]]) -> Tuple[List[WeightFile], List[ManualFile]]:
    """The registry entries named in ``only`` (all when empty). Unknown names are a one-line error."""
    if not only:
        return list(REGISTRY), list(MANUAL)
    unknown = [n for n in only if n not in ALL_NAMES]
    if unknown:
        raise ValueError(f"--only: unknown name(s) {unknown}; choose from {list(ALL_NAMES)}")
    return [e for e in REGISTRY if e.name in only], [m for m in MANUAL if m.name in only]


def _resolve(weights_dir: Path, rel: str) -> Path:
    path = Path(rel)
    return path if path.is_absolute() else weights_dir / path


def describe(entry: WeightFile, weights_dir: Path) -> str:
    size = f", {entry.size / 1e6:.0f} MB" if entry.size else ""
    return f"{entry.name}: {entry.url}{size} -> {entry.target(weights_dir)}"


def install(
    entry: WeightFile, weights_dir: Path, *, force: bool = False, show_progress: bool = True, retries: int = 2,
) -> str:
    """Download (or keep) one registry entry; returns a one-line summary. Raises DownloadError."""
    target = entry.target(weights_dir)
    if not entry.is_archive:
        result = download(entry.url, target, entry.sha256, force=force, retries=retries, show_progress=show_progress)
        return f"{entry.name}: {result.status} {result.path}"
    files = entry.installed_files(weights_dir)
    if not force and all(p.is_file() and (d is None or sha256_file(p) == d) for p, d in files):
        return f"{entry.name}: present {target}"
    check_writable(target)
    archive = target.parent / Path(entry.url).name
    result = download(entry.url, archive, entry.sha256, force=force, retries=retries, show_progress=show_progress)
    states = extract_zip_members(archive, entry.members, target, force=force)
    archive.unlink()  # the extracted, verified members are what the loaders read
    return f"{entry.name}: {result.status} and extracted {', '.join(states)} into {target}"


@dataclass
class VerifyReport:
    name: str  # registry / manual name
    ok: bool  # every required file present and valid
    lines: List[str]  # one line per file


def verify_download(entry: WeightFile, weights_dir: Path) -> VerifyReport:
    lines, ok = [], True
    for path, digest in entry.installed_files(weights_dir):
        if not path.is_file():
            ok = False
            lines.append(f"missing {path} (run: python scripts/download_weights.py --only {entry.name})")
        elif digest is not None and sha256_file(path) != digest:
            ok = False
            lines.append(f"BAD {path}: sha256 differs from the pin {digest[:12]}... (delete it and download again)")
        else:
            lines.append(f"ok {path}")
    return VerifyReport(entry.name, ok, lines)


def _check_fastavatar_file(path: Path) -> str:
    """Load one official file with our strict loaders; returns a short description (raises on failure)."""
    from fastavatar.io.checkpoints import load_decoder, load_tracker, load_w_encoder

    if path.name == "decoder_neutral_flame.pth":
        decoder, w_vectors, _ = load_decoder(path)
        subjects = 0 if w_vectors is None else w_vectors.shape[0]
        return f"decoder loads strictly ({decoder.num_gaussians} Gaussians, {subjects} W rows)"
    if path.name == "encoder_neutral_flame.pth":
        load_w_encoder(path)
        return "W encoder loads strictly"
    if path.name == "dino_encoder.pth":
        load_tracker(path)
        return "tracker loads strictly"
    if path.suffix == ".ply":
        from fastavatar.io.ply import load_ply

        splats = load_ply(path)
        return f"template PLY with {splats['means'].shape[0]} Gaussians"
    if path.parent.name == "flame":
        from fastavatar.flame.model import load_flame_model

        model = load_flame_model(path)
        return f"FLAME model with {model.num_vertices} vertices, {model.num_faces} faces"
    return "present"


def verify_manual(entry: ManualFile, weights_dir: Path) -> VerifyReport:
    lines, ok = [], True
    for rel in entry.files + entry.optional:
        path = _resolve(weights_dir, rel)
        if not path.is_file():
            if rel in entry.optional:
                lines.append(f"absent (optional) {path}")
                continue
            ok = False
            lines.append(f"missing {path}")
            continue
        try:
            lines.append(f"ok {path}: {_check_fastavatar_file(path)}")
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported as one line
            ok = False
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            lines.append(f"BAD {path}: {message}")
    if not ok:
        lines.append("how to get it: " + entry.instructions.format(weights_dir=weights_dir))
    return VerifyReport(entry.name, ok, lines)


def run_download_weights(
    only: Optional[Sequence[str]] = None,
    weights_dir: Path = DEFAULT_WEIGHTS_DIR,
    *,
    dry_run: bool = False,
    verify: bool = False,
    force: bool = False,
    show_progress: bool = True,
    retries: int = 2,
    echo: Callable[[str], None] = print,
) -> int:
    """What ``scripts/download_weights.py`` does. Returns the process exit status (0 = all good)."""
    weights_dir = Path(weights_dir)
    downloads, manual = select(only)
    if verify:
        reports = [verify_download(e, weights_dir) for e in downloads] + [verify_manual(m, weights_dir) for m in manual]
        for report in reports:
            echo(f"[verify] {report.name}: {'ok' if report.ok else 'NOT OK'}")
            for line in report.lines:
                echo(f"    {line}")
        return 0 if all(r.ok for r in reports) else 1
    if dry_run:
        for entry in downloads:
            echo(f"[dry-run] {describe(entry, weights_dir)}  (sha256 {entry.sha256[:12]}...)")
        for m in manual:
            echo(f"[dry-run] {m.name}: not downloadable; " + m.instructions.format(weights_dir=weights_dir))
        return 0
    failures = 0
    for entry in downloads:
        try:
            echo(f"[weights] {install(entry, weights_dir, force=force, show_progress=show_progress, retries=retries)}")
            if entry.licence:
                echo(f"    licence: {entry.licence}")
        except DownloadError as exc:
            failures += 1
            echo(f"[weights] {entry.name}: FAILED: {exc}")
    for m in manual:
        report = verify_manual(m, weights_dir)
        if report.ok:
            echo(f"[weights] {m.name}: present ({'; '.join(report.lines)})")
        else:
            echo(f"[weights] {m.name}: cannot be downloaded automatically; "
                 + m.instructions.format(weights_dir=weights_dir))
    return 1 if failures else 0
