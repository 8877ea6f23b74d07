"""What `vidrd-rt inspect` reports: parameter counts and the state-dict layout in the authors' key names."""

from __future__ import annotations

from .config import MODEL_PRESETS
from .model import VidRDModel
from .weights import ModelSource, load_model


def inspect_model(source: ModelSource, layout: bool = False) -> dict:
    """A preset is built on the meta device (no memory, no weights); files are loaded and so fully checked."""
    if source.kind() == "preset":
        model = VidRDModel.build(MODEL_PRESETS[source.model], device="meta")
    else:
        model = load_model(source, device="cpu")
    report = {"config": model.config.to_dict(), "counts": model.parameter_counts()}
    if layout:
        report["layout"] = model.authors_layout()
    return report
