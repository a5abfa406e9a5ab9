"""Speed, memory and quality benchmarks. Each prints ratios or tables measured side by side in one run."""
