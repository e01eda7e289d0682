require "fileinto"; fileinto "A"; fileinto :copy "A";
