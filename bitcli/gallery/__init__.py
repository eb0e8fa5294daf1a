"""`bit eval --report`: the per-image results an evaluation keeps (`records`), the report page (`page`) and the
report folder with its pictures and CSV files (`build`)."""
