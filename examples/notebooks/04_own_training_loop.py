# Databricks notebook source
# MAGIC %md
# MAGIC # Your own training loop with the loader
# MAGIC
# MAGIC Requirements: any notebook with torch (a Databricks Runtime ML, or serverless GPU), the spark-mnist wheel,
# MAGIC and a dataset ingested by `01_ingest_to_volume`. The loader reads this rank's share of the shards (here one
# MAGIC process, so all of them); each new `for` over it is the next epoch, and its `state_dict()` resumes mid-epoch.
# MAGIC Inside a function that torchrun, TorchDistributor or `@distributed` runs once per rank, the same code gives
# MAGIC every rank its exact share (`examples/serverless_gpu_train.py` is such a function).

# COMMAND ----------

dbutils.widgets.text("volume", "/Volumes/main/default/mnist")
dbutils.widgets.text("dataset", "mnist")
dbutils.widgets.text("epochs", "2")
volume, dataset = dbutils.widgets.get("volume"), dbutils.widgets.get("dataset")

# COMMAND ----------

import torch
import torch.nn.functional as F

import spark_mnist.torch

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
train_loader = spark_mnist.torch.loader(f"{volume}/parquet/{dataset}", split="train", batch_size=128, seed=0)
test_loader = spark_mnist.torch.loader(f"{volume}/parquet/{dataset}", split="test", batch_size=1000)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10)).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

# COMMAND ----------

for epoch in range(int(dbutils.widgets.get("epochs"))):
    model.train()
    for images, labels in train_loader:  # uint8 (B, 1, 28, 28) and int64 (B,): scale on the device
        images, labels = images.to(device).float() / 255, labels.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, labels in test_loader:
            predicted = model(images.to(device).float() / 255).argmax(1).cpu()
            correct, seen = correct + int((predicted == labels).sum()), seen + len(labels)
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {correct / seen:.4f}")
    state = train_loader.state_dict()  # save it with the model to resume mid-epoch after a restart
