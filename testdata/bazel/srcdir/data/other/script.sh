#!/bin/sh
echo "script in a source directory"
