"""SageMaker: the training entry point every host of a job runs (`entry.py`, reading the
SageMaker environment contract in `environment.py`) and `dlpipe sagemaker train` (`cli.py`),
which submits a dlpipe config as a training job through the `sagemaker` SDK
(`pip install 'dlpipe[sagemaker]'`). Nothing here imports the SDK until a job is submitted.
"""
