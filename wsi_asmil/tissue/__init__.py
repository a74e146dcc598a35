"""What on a slide is tissue and what is tumour: segmentation, the mask files every later stage reads,
and ground-truth annotations rasterised to truth masks."""
