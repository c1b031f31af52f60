"""How the shipped base (assets/base) was made: synthetic data, pretraining, model card; `pretrain-base`."""
