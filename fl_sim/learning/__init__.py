"""What both sides train with: data sets, partitions, models, an update's arithmetic, accuracy."""
