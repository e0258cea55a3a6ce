"""CutLER (Wang et al., 2023): MaskCut pseudo-masks (``pseudo_masks``), a class-agnostic detector trained on
them, and self-training rounds. Submodules are imported where used, so importing this package stays cheap."""
