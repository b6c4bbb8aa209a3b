#!/bin/sh
echo "lcov_merger: not available in the offline actiond test workspace" >&2
exit 1
