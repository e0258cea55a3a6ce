"""The runs floor: everything that runs something end to end (training, offline evaluation, multi-stage
pipelines, the CutLER stages, reopening a trained run). Nothing below this floor imports it."""
