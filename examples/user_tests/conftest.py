# The one line that opts a test suite into spark-mnist's test kit (installed with the wheel).
pytest_plugins = ["spark_mnist.testing"]
