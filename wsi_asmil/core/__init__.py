"""Small shared utilities that every stage may use and that import no stage: atomic file writing,
command-line helpers, devices and memory, the raster canvas, the run folder's layout and run ids."""
