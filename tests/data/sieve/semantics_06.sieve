require "fileinto"; fileinto "";
