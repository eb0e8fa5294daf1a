"""Where `bit finetune` and `bit eval` find their examples: class folders, CSV/JSONL label files, and Hugging
Face datasets (parquet files, `datasets.save_to_disk` folders, `hf://datasets/OWNER/NAME` on the Hub).

Every source gives the same data set (bitcli.sources.examples.ImageFolder): classes in order, each example's
class and a reference that bitcli.sources.rows.load_example opens. A source changes how examples are found,
never what training does with them. bitcli.sources.locate reads DATA and picks the source. Nothing here imports
bitcli.data (training's sampling and decoding), which builds on this package; this __init__ imports nothing.
"""
