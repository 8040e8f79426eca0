"""The parts a config builds, and what they are made of.

- schema: the types of the top-level and `trainer.*` keys, the values that cannot train
- keys, annotated: the keys hsci reads, each other refused where it came from; a builder's settings against the
  types its signature declares
- datasets, splits, datafiles: what a dataset builder returns (`Data`), how missing splits are carved, and the
  files datasets are read from
- loaders: feeding a dataset to the device
- world: this process's place among a run's processes, and what the ranks agree on
- build: a composed config turned into a run's `Parts` and its `Optim`
- pretrained: where pretrained weights come from (torch's and the Hugging Face hub's caches), fetched before a run
- finetune: a model's head and backbone, the backbone frozen and thawed, its learning rate apart

The builders that configs name in `_target_` are public and live at hsci's top level: `hsci.data`, `hsci.models`,
`hsci.schedulers`; they build from the pieces here.

Imports: the base (`hsci`, `hsci.interrupt`, `hsci.report`), the builders, and each other; never the record, the
loop, the jobs or the door.
"""
