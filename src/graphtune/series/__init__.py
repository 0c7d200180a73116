"""The CSV series task: classify or regress the next step from stacked CSV channels (GraphTune's second task).

The package, one module per concern (the contract its modules keep with each other):

data.py       read_channels(paths) -> SeriesArray (values float32 (N series, C channels, T steps), ids, timestamps)
              LabelRule.parse("nonzero" | "gt THR" | "lt THR" | "quantile Q" | None) ; rule.fit(...) on train only
              WindowSpec(context_len, label_src_ch=0, label_offset=1, drop_label_from_x=False)
              make_splits(array, spec, mode="holdout"|"group"|"rolling", ...) -> list[Fold]  (Fold: train/val/test
              WindowIndex: (series, start) int64 arrays; windows are index arithmetic over the array, never copies)
              WindowData(array, spec, index, rule) -> gathers batches: x (B, C', L) float32, y (B,) float32
              export_city(city, out_dir, params) -> channel CSVs of any city in the city table
models.py     BACKBONES registry: ttm (transformers' PatchTSMixer), conv (native), each nn.Module
              forward(x (B, C', L)) -> (B,) logits (classify) or predictions (regress); build_backbone(...)
              reference.py: the scikit-learn reference (logistic / ridge regression on flattened windows)
losses.py     soft_f1, classify_loss(alpha, pos_weight), regress losses
metrics.py    classify_metrics / best_threshold / regress_metrics (scikit-learn), plots (PNG)
commands.py   graphtune series train | finetune | infer | export: one MLflow run each (experiment "series"),
              artifacts under artifacts/<mode>_<task>_ctx<L>_ch<C>_alpha<a>_pw<pw>_<backbone>_seed<s>_split<mode>/
"""
