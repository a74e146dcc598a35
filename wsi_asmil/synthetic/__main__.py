"""``python -m wsi_asmil.synthetic``: write the synthetic demo cohort."""

from wsi_asmil.synthetic.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
