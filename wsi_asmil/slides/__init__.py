"""Reading slides: one :class:`~wsi_asmil.slides.slide.Slide` over OpenSlide and TIFF, the choice of
tile reader (direct JPEG or OpenSlide), the label table and the cohort inventory."""
