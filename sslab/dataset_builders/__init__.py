"""Tools that write datasets to disk: the stamps dataset, Atari frame shards, litdata streaming shards and the
embedded Fashion-MNIST subset. ``sslab.data``'s DataModules read what they write (data=stamps and data=atari
call their builder on first use); each also runs as ``python -m sslab.dataset_builders.<name>``."""
