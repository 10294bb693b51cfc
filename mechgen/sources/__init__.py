"""Where the weights and the evaluation text come from: the hub and its cache, local checkpoint
directories, the embedded toy suite, the evaluation sentences."""
