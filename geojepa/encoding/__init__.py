"""Running a trained encoder over a region's token shards, for every use of a model: ``geojepa evaluate``,
``geojepa embed`` and the registered pyfunc. ``models`` resolves and checks the model, ``shards`` reads the
tokens and tile artifacts a batch at a time, ``pooling`` runs the encoder, ``spill`` keeps entity vectors on
disk and writes them out, ``neighbours`` is exact cosine kNN, ``classes`` the entities' tag classes."""
