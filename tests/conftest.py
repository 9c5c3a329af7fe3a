import os
import sys

# Tests import the independent numpy reference as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
