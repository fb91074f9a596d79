"""The names of sptutor's methods, in one place for the oracle, the real code, the model and the
command line: softmax attention first, then linear attention."""

SOFTMAX_METHODS = ("rsa", "ring", "ulysses", "usp", "lss")
LINEAR_METHODS = ("lasp", "lasp2")
METHODS = SOFTMAX_METHODS + LINEAR_METHODS
