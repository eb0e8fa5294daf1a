"""`bit eval --report`: the per-image results an evaluation keeps (`records`; a multi-label model's:
`multilabel_records`), the report page (`page`, with its calibration section `calibration`; a multi-label model's:
`multilabel_page`), the gallery's pictures (`drawing`) and the report folder with its CSV files (`build`)."""
