import sys
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import accuracy
accuracy.OVERRIDES["weight_granularity"] = "channel"
accuracy.main(sys.argv[1:])
