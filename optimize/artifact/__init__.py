"""The release artifact: writing its folder (model files, runtime, manifest last), packaging,
Triton's model repository, and the reports."""
