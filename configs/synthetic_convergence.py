# The DN-vs-baseline convergence experiment (scripts/convergence.py): the demo's model, trained longer.
# scripts/convergence.py runs it once with --use_dn and once with --no-use_dn.
_base_ = "synthetic.py"
epochs = 40
lr_drop = 32
save_checkpoint_interval = 100
