"""The training engine shared by pretrain, correct and distill."""
