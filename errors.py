"""The one exception type for mistakes a user can fix (bad config, bad data, missing files).

train.py and evaluate.py print it as one line without a traceback (HYDRA_FULL_ERROR=1 shows one);
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's config or data; the message names the key, file or row and what to do."""
