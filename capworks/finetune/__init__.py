"""`capworks finetune`: data from eval's references, ModelScope's OFA trainer, the model folder."""
