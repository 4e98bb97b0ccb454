"""What users run on a finished run: loaders, resharding, the DataComp export, teacher outputs and KD."""
