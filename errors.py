"""The one exception type that means "the user's input is wrong", not "the code is wrong".

The scripts print a UserError as a single line on stderr and exit 2; anything else keeps its
traceback, because it is a bug we want to see.
"""


class UserError(Exception):
    """Bad input: a flag, a file, a checkpoint. The message says what and how to fix it."""


# Ends every message about an input that is downloaded on first use (CoLA, tiktoken's BPE files, GPT-2's
# weights): that README section lists all three and where each goes offline.
OFFLINE_HINT = ' (README.md, section "Offline": what to place where)'
