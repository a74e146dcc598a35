"""What a person reads at the end: the HTML report, its zoomable viewer, and predictions on new slides."""
